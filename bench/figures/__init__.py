"""Publication figures drawn from the result store (``bench figure maps|shots|roc``).

* :mod:`bench.figures.maps`: the paper's qualitative figure (image, ground truth, one anomaly
  map per method, one colour scale);
* :mod:`bench.figures.shots`: a metric against the number of shots, mean and sample std over
  seeds, one panel per target;
* :mod:`bench.figures.roc`: image-level ROC curves of every method on one target;
* :mod:`bench.figures.common`: selecting cells, titles, saving;
* :mod:`bench.figures.cli`: the ``figure`` sub-commands.

Figures read only the stored cells (and, for maps, the test images the run read), never a
method or the backbone. Each builder returns a :class:`~bench.figures.common.FigureResult`
holding a matplotlib ``Figure`` (Agg canvas, no pyplot state) that the caller saves with
:func:`~bench.figures.common.save_figure`. Nothing here is imported by ``bench.figures.cli``
at start-up: matplotlib, pandas and the tables load only when a figure is drawn.
"""
