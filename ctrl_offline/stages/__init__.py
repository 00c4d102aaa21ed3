"""Pipeline stages: each reads the previous stage's files and writes its own (README.md, "The main job").

``sample`` → ``score`` → ``calibrate`` → ``build`` → ``train``, and ``inspect`` for any of their outputs;
``rounds`` chains them into on-policy rounds (``run_round``, docs/rounds.md).
Import the stage modules directly (``ctrl_offline.stages.sample`` …) or through the lazy
names on ``ctrl_offline``.
"""
