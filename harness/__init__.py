"""The program around the post's code: train.py's command line (cli), where a run keeps its files
and how they are read back (runs), what a run prints (runlog), how a command stops (stops), the
tutorial's published models (pretrained), the offline data of --synthetic (synthetic) and writing
files safely (files). The post itself is in the root: features.py, data.py, model.py, train.py.

Nothing is imported here: a script loads stops first, before any large library.
"""
