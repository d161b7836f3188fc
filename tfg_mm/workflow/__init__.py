"""Notebooks as steps: papermill execution, rendering and notebook parameters (:mod:`.notebooks`), and
``make all``'s sequence of them (:mod:`.pipeline`).
"""
