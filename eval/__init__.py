"""Benchmark scorers (hallucination and helpfulness), the LLM judge, and the comparison report.

benchmark.py  CLI: generate answers (training.predict) and score one benchmark -> results JSON
chair.py      Object HalBench / CHAIR          pope.py         POPE (3 splits, F1 mean)
amber.py      AMBER                            mmhal.py        MMHal-Bench (judge 0-6)
llava_bench.py LLaVA-Bench (relative score)    embedded.py     the embedded world's benchmarks
judge.py      OpenAI-compatible judge client with a disk cache and retries
nouns.py      tokenizer + noun lemmatizer without downloaded data
answers.py    resumable generation, answer files      report.py  Markdown table + bar charts
"""
