"""The record layer: vggnet's own files (the model card, the checkpoint, the run lock, the run directory) and the
weight formats of others (weights/), read into one :class:`~vggnet.store.card.LoadedModel` by
:func:`vggnet.store.load.load`; :mod:`vggnet.store.build` assembles ``create_model(weights=..., features_only=...)``."""
