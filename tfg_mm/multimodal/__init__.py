"""The text branch: text encoders and prompts (:mod:`.text`), the residual fusion (:mod:`.fusion`) and
the phase-2 model that puts them on the detector (:mod:`.model`).
"""
