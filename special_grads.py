"""The second derivative of max pooling, for MAML's second-order meta-gradient.

The reference registered a gradient for `MaxPoolGrad` because TensorFlow 1.x had none.
Current TensorFlow ships one; registering ours again would raise, so we register it only where
the running TensorFlow lacks it. `tests/test_special_grads.py` checks whichever is active
against finite differences.
"""
from tensorflow.python.framework import ops
from tensorflow.python.ops import array_ops, gen_nn_ops


def _max_pool_grad_grad(op, grad):
    """Gradient of MaxPoolGrad(orig_input, orig_output, grad_of_output) with respect to its inputs.

    MaxPoolGrad routes each output gradient to the arg max of its window; as a function of the
    incoming gradient it is linear, and piecewise constant in the original input and output.
    """
    return (array_ops.zeros_like(op.inputs[0]),
            array_ops.zeros_like(op.inputs[1]),
            gen_nn_ops.max_pool_grad_grad(op.inputs[0], op.inputs[1], grad,
                                          op.get_attr('ksize'), op.get_attr('strides'),
                                          padding=op.get_attr('padding'),
                                          data_format=op.get_attr('data_format')))


def has_gradient(op_type):
    try:
        ops.gradient_registry.lookup(op_type)
        return True
    except LookupError:
        return False


REGISTERED_HERE = not has_gradient('MaxPoolGrad')
if REGISTERED_HERE:
    ops.RegisterGradient('MaxPoolGrad')(_max_pool_grad_grad)
