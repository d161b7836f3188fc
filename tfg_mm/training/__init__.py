"""Running an experiment: the run contract and run folders (:mod:`.runs`), tracking (:mod:`.tracking`),
the one training loop (:mod:`.loop`), the one experiment sequence (:mod:`.experiment`) and the two
phases (:mod:`.baseline`, :mod:`.phase2`).
"""
