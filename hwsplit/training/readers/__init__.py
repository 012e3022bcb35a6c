"""One reader per data-set format (digits, CIFAR pickles, npz, image folders); the registry is
:mod:`hwsplit.training.data`."""
