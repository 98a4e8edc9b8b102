"""One module per model family; each exposes `FAMILY` (see base.Family). The table of families is
megagsm.models.registry."""
