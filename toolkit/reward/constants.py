"""Calibration settings the train-reward and calibrate flags declare, without numpy: importing them is part of
every `llamakit` start-up (toolkit/reward/calibrate.py does the fitting)."""

METHODS = ("temperature", "isotonic")
# A Bradley–Terry model is trained on the very likelihood σ(r_c − r_r), so T = 1 is where the fit starts, and a
# held-out split of a few hundred pairs pins T down only loosely: in 5-fold cross-validation on HH dev, T fitted
# by plain maximum likelihood on each fold's 92 held-out pairs ranged 0.43–3.9 while the test folds wanted
# 0.85–1.56, and applying it made the test Brier and NLL worse (benchmarks/reward_calibration.py). With the
# prior log T ~ N(0, 0.2²) T leaves 1 only as far as the held-out evidence outweighs it; on thousands of pairs
# the data decide.
TEMPERATURE_PRIOR_SD = 0.2
