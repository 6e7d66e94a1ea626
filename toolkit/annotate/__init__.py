"""Human feedback: a small local web app where people rank answers and play user and assistant.

db.py        SQLite (WAL) store: items, annotators, rankings, chats; every answer committed before replying
tasks.py     task files -> rank items (K candidates per prompt), optionally written by a teacher at load time
app.py       FastAPI routes, token auth, the HTML/JS pages under templates/annotate/
export.py    rankings -> preference pairs, chats and rewrites -> conversation rows (generate-data formats)
agreement.py inter-annotator agreement (Cohen's, Fleiss' kappa) and people vs LLM-judge agreement
"""
