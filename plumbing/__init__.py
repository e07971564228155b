"""The machinery: what keeps runs safe and teaches nothing about training. A learner never needs to open it.

    stops.py     a Ctrl-C or a stop signal ends a program in one line from its first moment (installed when
                 common.py imports it, first); run_main turns what a user can get wrong into one line and an exit code;
                 shown(text): text from a file as it can be printed (control characters made visible)
    settings.py  a script's UPPER_CASE constants as checked flags; a run record's settings checked the same way
    data.py      the Fashion-MNIST files: found, downloaded if need be, verified, read
    files.py     files we write (atomically, never through a link) and files a user hands us (read within bounds)
    runs.py      the run folder: its record written after every epoch (Run) and read back (load_run, read_record,
                 load_weights), for predict.py and compare.py alike
    figures.py   the figures a run writes beside its record: plain functions, each returning a matplotlib Figure

It imports nothing above it: not common.py, a lesson or a tool. The lessons reach it through common.py;
resnet_transfer.py also reads weights files with files.py. Rebuilding a model from a run is predict.py's work.
"""
