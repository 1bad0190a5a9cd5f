"""The reference's own code, unmodified, on TensorFlow 1.2: its outputs for one golden case.

TF 1.1 and 1.2 are the versions the reference first ran on (TF 1.0 cannot take the second
derivative of softmax cross entropy; TF 1.3 changed tf.nn.moments, see utils.moments). Their
contrib batch_norm is not fused and its moments have exact derivatives of every order. This
records the meta-gradient the reference computes there, which the port's default must match
(tests/test_golden.py). Made with Python 3.6 (pyenv) and the tensorflow 1.2.0 wheel:

    python3.6 -m venv tf12 && tf12/bin/pip install --no-deps tensorflow==1.2.0
    tf12/bin/pip install 'numpy<1.17' 'protobuf<3.20' six werkzeug==0.16.1 backports.weakref
    tf12/bin/python tests/reference_tf12/make_outputs.py $MAML_REFERENCE_DIR \\
        tests/golden/cases/omniglot_5w1s tests/reference_tf12/omniglot_5w1s.npz

($MAML_REFERENCE_DIR: the reference's code, see bench/reference.py.)
"""
import json
import sys

import numpy as np

reference, case_dir, out = sys.argv[1:4]
case = json.load(open(case_dir + '/case.json'))
sys.argv = ['main.py'] + ['--%s=%s' % (k, v) for k, v in case['flags'].items() if v is not None]
sys.path.insert(0, reference)
import tensorflow as tf  # noqa: E402
import main  # noqa: E402,F401  (defines the reference's flags)
from maml import MAML  # noqa: E402

model = MAML(case['dim_input'], case['dim_output'], test_num_updates=case['test_num_updates'])
model.construct_model(input_tensors=None, prefix='metatrain_')
inputs = np.load(case_dir + '/inputs.npz')
feed = {model.inputa: inputs['inputa'], model.inputb: inputs['inputb'],
        model.labela: inputs['labela'], model.labelb: inputs['labelb']}
fetch = {'metatrain_loss_pre': model.total_loss1}
fetch.update({'metatrain_loss_post%d' % (j + 1): loss for j, loss in enumerate(model.total_losses2)})
fetch.update({'grad/' + v.op.name: g for g, v in model.gvs})
with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    tf.train.Saver(tf.get_collection(tf.GraphKeys.TRAINABLE_VARIABLES)).restore(sess, case_dir + '/ckpt/model0')
    values = sess.run(fetch, feed)
np.savez_compressed(out, tf_version=tf.__version__, **values)
print('wrote', out, 'with TensorFlow', tf.__version__)
