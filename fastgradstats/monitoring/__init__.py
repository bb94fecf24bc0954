"""The monitoring layer: the training :class:`~fastgradstats.monitoring.monitor.Monitor`, its alerts, the
logging sinks and the plots. These consume results; they compute no statistics of their own."""
