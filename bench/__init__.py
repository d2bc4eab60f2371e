"""ultraad-bench: a benchmark harness for few-shot CLIP adaptation in ultrasound anomaly detection.

Data flows one way: dataset -> backbone features -> method -> predictions -> metrics ->
result store -> tables. Each stage lives in its own module with a small typed interface.
"""

__version__ = "0.1.0"
