"""The paper's section 5 (specialists), in PyTorch without Ray: the coordinator's class subsets
from the generalists' predictions (clustering, coordinator), a specialist's labels, sampling and
dustbin correction (specialist) and its trainer (trainer), and eq. 5's combination of the
generalist with the specialists (combine) applied to models (ensemble).
"""
