"""Import cycles between the top-level modules of a crate, from the
`crate::` paths in its sources (comments and test modules skipped); prints
each cycle, [] when there is none. With V=-v, the whole graph.
Usage: python3 scripts/module_cycles.py engine/src node/src"""
import re,os,collections,sys
def graph(root):
    g=collections.defaultdict(set); mods=set()
    for f in os.listdir(root):
        if f.endswith('.rs') and f not in ('lib.rs','main.rs'): mods.add(f[:-3])
        elif os.path.isdir(os.path.join(root,f)): mods.add(f)
    for m in mods:
        paths=[os.path.join(root,m+'.rs')] if os.path.exists(os.path.join(root,m+'.rs')) else []
        d=os.path.join(root,m)
        if os.path.isdir(d):
            for r,_,fs in os.walk(d): paths+=[os.path.join(r,x) for x in fs if x.endswith('.rs')]
        for p in paths:
            t=open(p).read().split('#[cfg(test)]')[0]
            t='\n'.join(l for l in t.split('\n') if not l.strip().startswith('//'))
            for x in re.findall(r'crate::([a-z_]+)',t):
                if x in mods and x!=m: g[m].add(x)
    return g
def sccs(g):
    idx={};low={};st=[];on=set();res=[];i=[0]
    sys.setrecursionlimit(10000)
    def sc(v):
        idx[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
        for w in g.get(v,()):
            if w not in idx: sc(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],idx[w])
        if low[v]==idx[v]:
            comp=[]
            while True:
                w=st.pop();on.discard(w);comp.append(w)
                if w==v:break
            if len(comp)>1: res.append(sorted(comp))
    for v in list(g):
        if v not in idx: sc(v)
    return res
for root in sys.argv[1:]:
    g=graph(root); print(root, sccs(g))
    if '-v' in os.environ.get('V',''):
        for a in sorted(g): print('  ',a,'->',sorted(g[a]))
