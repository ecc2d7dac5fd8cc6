"""Studies (``rlm experiment``, ``rlm merge-eval``), one concern per module:

``config``     the :class:`~rlm.core.study.config.ExperimentConfig` and its parts, cross-checked
``presets``    the built-in preset files and ``load_experiment`` (``--quick``, ``--set``)
``check``      ``check_plugins``: the config against the installed plugins, before any work
``plan``       ``plan_steps`` (named steps with configs and dependencies) and ``build_graph``
``graph``      the cached, resumable step-graph runner
``steps``      ``StudySteps``: one function per step kind, calling the engines
``mixture``    the warm-up's task mixture
``landscape``  the landscape around an expert
``scores``     evaluation results arranged for the tables, seeds combined
``tables``     Tables 1-3: numbers, bootstrap intervals, Markdown/CSV/JSON
``figures``    the report's plots
``report``     ``write_report``: report.md from one function per section
``run``        ``run_study`` and what ``rlm merge-eval`` builds its study from
"""
