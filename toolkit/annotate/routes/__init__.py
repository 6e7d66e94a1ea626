"""The annotation app's routes, one APIRouter per module.

pages.py   /health, the login form, logout, and the annotation page itself
rank.py    /api/me, /api/next, /api/items, /api/history, /api/rank, /api/skip
chats.py   /api/chats...: chats an annotator writes alone or with a teacher model

Routes that answer a dict carry no return annotation on purpose: FastAPI would take it for a response model and
send the answer through pydantic again.
"""
