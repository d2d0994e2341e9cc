"""Studies that sweep the compiler stages to measure claims (accuracy–throughput frontiers, search time)."""

from bitmix.study.frontier import Recipe, StudyConfig, default_config, render_results, run_frontier

__all__ = ["Recipe", "StudyConfig", "default_config", "render_results", "run_frontier"]
