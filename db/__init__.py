"""ct-triage's database: models, sessions, migrations, repositories.

Imports nothing else of ct-triage's (and never celery, pynetdicom or torch).
"""
