"""Interpretability suite for SAEs over token activations (docs/methods.md 5): plain functions, no Lightning."""

from evaluation.interpret.browser import write_feature_browser
from evaluation.interpret.codes import SparseCodes, encode_sparse
from evaluation.interpret.cross_model import compare_models, word_codes
from evaluation.interpret.frontier import pareto_front, score_sae
from evaluation.interpret.pooling import decompose_sentence, pooling_contributions
from evaluation.interpret.pos import label_features, purity_summary
from evaluation.interpret.probes import fit_linear, fit_mlp, probe_caches
from evaluation.interpret.pseval import PSEvalResult, ps_eval
from evaluation.interpret.report import InterpretReport, interpret_sae
from evaluation.interpret.stability import group_share, match_decoders
from evaluation.interpret.suite import SuiteResult, run_suite

__all__ = ["InterpretReport", "SparseCodes", "decompose_sentence", "encode_sparse", "group_share",
           "interpret_sae", "label_features", "match_decoders", "pooling_contributions", "purity_summary"]
__all__ += ["PSEvalResult", "SuiteResult", "ps_eval", "run_suite", "write_feature_browser"]
__all__ += ["compare_models", "fit_linear", "fit_mlp", "pareto_front", "probe_caches", "score_sae", "word_codes"]
