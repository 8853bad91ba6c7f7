"""The digits reproduction of the LCM paper's Table 1 (configs/digits.py), offline at toy size.

run.py: the stages in order; teacher.py: the latent-diffusion teacher trained from the digits;
classifier.py: the digit classifier whose features give the FD; evaluator.py: the in-loop scores
(``config.eval.evaluator = "digits"``); table.py: the table, grids and plot. Everything else is the
generic library the SD configs use.
"""
