"""Where and on how many processes a run executes: the device and mixed precision it can use, the
DataLoader settings that suit it (:mod:`.devices`), and the collectives of data parallelism (:mod:`.distributed`).
"""
