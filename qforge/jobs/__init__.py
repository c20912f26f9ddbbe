"""The fine-tuning service: OpenAI-compatible files and fine-tuning jobs over qforge's trainer.

store.py   SQLite state (WAL) beside the uploads and job folders
worker.py  the worker process (one job at a time, each in a trainer subprocess) and its supervisor
api.py     the HTTP routes mounted on the inference server by `qforge serve --jobs`, and the dashboard
web/       the dashboard's static files (plain HTML, CSS and JS)
"""
