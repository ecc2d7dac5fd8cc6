"""Built-in task plugins: one package per task (math, code, instruction_following, puzzle, rank), each holding
its whole domain (generator, loaders, verifier and scoring) beside the Task class in its ``__init__``."""
