"""Test-session set-up: one intra-op thread.

CI and the dev machine have 2 cores shared by pytest and the subprocesses some tests start; with torch's default
thread pool the contention made one evaluate() 17x slower (15.6 s vs 0.9 s) and test_ngram 52 s instead of 9 s.
Results do not depend on it (the golden curve is bitwise the same with 1 or 2 threads).
"""
import torch

torch.set_num_threads(1)
