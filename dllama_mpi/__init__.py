"""dllama-mpi: tensor-parallel LLM inference across several machines as one MPI job."""

__version__ = "0.1.0"
