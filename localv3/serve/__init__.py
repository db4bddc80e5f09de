"""`localv3 serve`: an OpenAI-compatible HTTP server over one loaded model.

requests.py validates request bodies, turns.py runs a request on the engine (in the worker
thread that owns it, worker.py), answer.py splits the generated text into reasoning, content
and tool calls (tools.py), replies.py writes the OpenAI response objects, app.py is the
Starlette application and server.py runs it under uvicorn; sessions.py says how many
conversations the engine can keep cached.
"""
