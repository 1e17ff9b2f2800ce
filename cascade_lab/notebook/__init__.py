"""IPython/Jupyter front end: magics, panels and displays (imports no torch until a job runs)."""
