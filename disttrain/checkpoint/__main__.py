"""`python -m disttrain.checkpoint export DIR out.safetensors`: one checkpoint as one file."""
import sys

from disttrain import checkpoint_dist

sys.exit(checkpoint_dist.main())
