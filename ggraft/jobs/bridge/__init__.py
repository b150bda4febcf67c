"""``ggraft bridge``: a trained projector re-targeted to a text model of another width and
vocabulary, without images or training.

A projector's output lives in its donor text model's input-embedding space; the token embeddings
of two text models are related closely by a linear map over the tokens they share.  ``tokens``
pairs the tokens across tokenizer conventions, ``tables`` streams their embedding rows, ``fit``
fits the map (ridge least squares in float64) and scores it on held-out tokens, ``last_layer``
says which mmproj tensors each projector type ends with, ``write`` writes the mmproj with the map
composed into them, and ``job`` puts it together.
"""
from .job import MIN_HELD_OUT, MIN_TOP1, BridgeReport, bridge

__all__ = ["BridgeReport", "MIN_HELD_OUT", "MIN_TOP1", "bridge"]
