"""Celery applications the tests run under real workers (see tests/test_celery.py)."""
