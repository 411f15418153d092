"""The paper's section 5 (specialists), pure PyTorch, no Ray: class subsets from the generalist's
covariance, specialist training with a dustbin class, and the KL-minimising combination.

Not built yet: the specialists issue fills this package.
"""
