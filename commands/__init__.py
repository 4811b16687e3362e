"""The commands ``train.py`` runs beside LightningCLI's fit / validate / test (export, evaluate, interpret, study,
push, mine), each parsing its options and calling library functions; and what ``train.py fit`` applies before a run
(``run_defaults``, ``run_environment``)."""
