"""Simulated NAS on tabular benchmarks, plain and proxy-assisted (GradSign paper, section 5.3 and
Appendix A.5): random search, regularised evolution, REINFORCE, Hyperband and BOHB, written against the
``SearchSpace`` interface; ``run_search`` repeats one of them and aggregates the results."""
from gradsign.search.bohb import BOHBSampler, bohb, fit_kde, kde_split
from gradsign.search.evolution import regularized_evolution
from gradsign.search.hyperband import (PROTOCOLS, hpbandster_bracket, hpbandster_budgets, hyperband,
                                       hyperband_brackets)
from gradsign.search.random_search import random_search
from gradsign.search.reinforce import CategoricalPolicy, MovingAverage, reinforce
from gradsign.search.run import ALGORITHMS, best_so_far, format_results, plot_best_so_far, run_once, run_search
from gradsign.search.simulator import (Assist, BenchmarkArrays, BudgetExhausted, SearchContext, Simulator,
                                       resolve_assist, validation_pass_epochs)

__all__ = ["ALGORITHMS", "Assist", "BOHBSampler", "BenchmarkArrays", "BudgetExhausted", "CategoricalPolicy",
           "MovingAverage", "PROTOCOLS", "SearchContext", "Simulator", "best_so_far", "bohb", "fit_kde",
           "format_results", "hpbandster_bracket", "hpbandster_budgets", "hyperband", "hyperband_brackets",
           "kde_split", "plot_best_so_far", "random_search",
           "regularized_evolution", "reinforce", "resolve_assist", "run_once", "run_search",
           "validation_pass_epochs"]
