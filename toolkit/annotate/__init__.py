"""Human feedback: a small local web app where people rank answers and play user and assistant.

db.py        SQLite (WAL) store: items, annotators, rankings, chats; every answer committed before replying
tasks.py     task files -> rank items (K candidates per prompt), optionally written by a teacher at load time
app.py       the FastAPI app: routers, middleware, error handlers; the pages live under templates/annotate/
routes/      the routes, one APIRouter per area (pages and login, ranking, chats)
deps.py      shared state, token auth and JSON bodies as FastAPI dependencies; schemas.py: the bodies
guard.py     Host allow-list, CSRF check and security headers, in front of every route
export.py    rankings -> preference pairs, chats and rewrites -> conversation rows (generate-data formats)
agreement.py inter-annotator agreement (Cohen's, Fleiss' kappa) and people vs LLM-judge agreement
"""
