"""so8t.judge: the safety judge of ``so8t serve`` (judge.py), its temperature calibration (calibration.py)
and its labelled data (data.py)."""
