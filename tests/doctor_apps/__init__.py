"""Small WSGI apps for tests/test_doctor.py, each set up right or wrong in one way.

Creating an engine does not connect, so none of them needs a database server.
"""
