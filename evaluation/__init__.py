"""Scoring trained models: the STS suite and MTEB tasks over any encoder, the SAE interpretability suite
(``interpret``), and the studies' measurements and reports. Stands on the models and the data; callbacks and
commands run it."""
