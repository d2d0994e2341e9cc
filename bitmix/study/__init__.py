"""Studies that sweep the compiler stages to measure claims (accuracy–throughput frontiers, search time).

config (what to sweep) → sweep (score, allocate, measure; resumable via store) → additivity, stats →
render (markdown) and plots.
"""

from bitmix.study.config import MODELS, StudyConfig, all_methods, default_config
from bitmix.study.render import render_results
from bitmix.study.sweep import run_frontier, run_study

__all__ = ["MODELS", "StudyConfig", "all_methods", "default_config", "render_results", "run_frontier", "run_study"]
