"""The normalizers' names: light (no JAX), so that the config's key specs can list them
without importing the functions."""

NORMALIZERS = ('batch_norm', 'virtual_batch_norm', 'batch_renorm', 'layer_norm',
               'group_norm', 'noisy_batch_norm', 'stop_gradient_batch_norm', 'none')
# The ones that keep moving averages for inference (Algorithm 2's population statistics
# can replace them); layer and group norm normalise each example by itself.
MOVING_AVERAGE_NORMALIZERS = ('batch_norm', 'virtual_batch_norm', 'batch_renorm',
                              'noisy_batch_norm', 'stop_gradient_batch_norm')
