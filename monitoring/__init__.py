"""Runner-free monitoring: detectors over what a run measures, and the alert records they emit
(``schemas/alert.avsc``). The Beam and PyFlink adapters only route the alerts to their output."""
