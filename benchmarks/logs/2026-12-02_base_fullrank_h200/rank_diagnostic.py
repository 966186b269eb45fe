import numpy as np, sys
sys.path.insert(0, '/work/main')
from experiments import embedded_evaluation as ev, embedded_workdir as wd
from experiments import train_vae
from shelllcc.evaluation import classifier as clf_lib
from shelllcc.data.latent_cache import open_cache
import ml_collections, json
W = '/tmp/fresh2/workdir/demo'
cfg = ml_collections.ConfigDict(json.load(open(W + '/config.json')))
paths = wd.Paths(W) if hasattr(wd, 'Paths') else None
mean, std = wd.latent_stats(paths)
vae = train_vae.load(paths.vae)
builder = wd.builder(cfg, paths)
n = 64
real_test, labels, idx = ev.load_real(builder, "test", n, wd.ATTRIBUTE_FIELDS)
clf = clf_lib.load_classifier(paths.classifier)
def tok(a):
    N,T,H,Wd,C=a.shape
    return a.reshape(N,T,H//4,4,Wd//4,4,C).transpose(0,1,2,4,3,5,6).reshape(-1,16*C)
def untok(t, shape):
    N,T,H,Wd,C=shape
    return t.reshape(N,T,H//4,Wd//4,4,4,C).transpose(0,1,2,4,3,5,6).reshape(shape)
Wk = np.load('/work/main/configs/pretrained/demo/base.npz')['params/proj_out.kernel'].astype(np.float64)
_,_,Vt = np.linalg.svd(Wk, full_matrices=True)
span, comp = Vt[:192], Vt[192:]
c = open_cache(paths.train_cache if hasattr(paths,'train_cache') else W+'/latents/train', latent_dtype=np.float32)
tr = np.stack([c[i]['latents'] for i in range(len(c))]).astype(np.float64)
tr = (tr - np.asarray(mean)) / np.asarray(std)
t = tok(tr); a, b = t @ span.T, t @ comp.T
A = np.concatenate([a, np.ones((len(a),1))], 1)
coef, *_ = np.linalg.lstsq(A, b, rcond=None)
r2 = 1 - ((A@coef - b)**2).mean() / b.var(0).mean()
print('normalised data: complement var', b.var(0).mean(), 'total var', t.var(0).mean(), 'R2 of linear fill', r2)
s = np.load(W + '/samples/base/seed0/samples/latents.npy').astype(np.float64)
ts = tok(s)
print('samples complement var', (ts@comp.T).var(0).mean())
fixed = ts @ span.T @ span + (np.concatenate([ts@span.T, np.ones((len(ts),1))],1) @ coef) @ comp
variants = {'base': s, 'complement_filled': untok(fixed, s.shape), 'complement_mean': untok(ts@span.T@span + b.mean(0)@comp, s.shape)}
for k, lat in variants.items():
    v = ev.decode_latents(vae, lat.astype(np.float32), mean, std)
    sc = ev.score_clips(v, labels, clf)
    acc = {a: float(np.mean(x)) for a, x in sc['correct'].items()}
    print(k, 'mean %.3f' % np.mean(list(acc.values())), {a: round(x,3) for a,x in acc.items()}, 'lapvar %.1f' % sc['laplacian_variance'].mean())
# real round trip through the same projection: what the rank limit costs on real latents
rl, _ = ev.load_test_latents(W+'/latents/test', n, mean, std)
tr_ = tok(rl.astype(np.float64))
for k, lat in {'real_vae': rl, 'real_projected_filled': untok(tr_@span.T@span + (np.concatenate([tr_@span.T, np.ones((len(tr_),1))],1)@coef)@comp, rl.shape),
               'real_plus_noise': untok(tr_ - (tr_@comp.T)@comp + np.random.default_rng(0).standard_normal((len(tr_),64))@comp, rl.shape)}.items():
    v = ev.decode_latents(vae, np.asarray(lat, np.float32), mean, std)
    sc = ev.score_clips(v, labels, clf)
    acc = {a: float(np.mean(x)) for a, x in sc['correct'].items()}
    print(k, 'mean %.3f' % np.mean(list(acc.values())), {a: round(x,3) for a,x in acc.items()}, 'lapvar %.1f' % sc['laplacian_variance'].mean())
