"""Reward models: train (Bradley–Terry), calibrate, evaluate, and score text for the PPO loop.

    from toolkit.reward import load_reward_model
    rm = load_reward_model("runs/rm")
    rm.score(prompts, responses)        # (r − mean) / T from calibration.json
    rm.raw_scores(prompts, responses)   # r
"""

from toolkit.reward.api import RewardModel, load_reward_model

__all__ = ["RewardModel", "load_reward_model"]
