"""The program around the post's code, one concern a module; harness/README.md maps them, and
`python tests/import_graph.py` prints who imports whom. The post itself is in the root: features.py,
data.py and model.py, which import nothing from here, and train.py.

Nothing is imported here: a script loads stops first, before any large library.
"""
