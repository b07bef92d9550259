"""Placement planning: measure the hardware, model its latencies, simulate placements, search them.

``profile``   measurements and fitted latency models of one device kind (``python -m jds.plan profile``)
``latency``   the latency models and their least-squares fit
``simulator`` a discrete-event replay of the engine's scheduling under a workload
``candidates`` the placements a number of devices allows
``search``    the highest rate each candidate sustains, ranked by goodput per device
``validate``  simulated against measured SLO attainment on the same requests
"""
