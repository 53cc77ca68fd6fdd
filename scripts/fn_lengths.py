"""Function lengths of the Rust sources under the given directories: count,
median, p90, share over 70 lines, and the five longest (test modules at the
end of a file are skipped). Usage: python3 scripts/fn_lengths.py node/src"""
import sys,re,os,statistics
def fns(path):
    out=[]
    lines=open(path).read().split("\n")
    i=0
    in_test=False
    while i<len(lines):
        l=lines[i]
        if re.match(r'\s*#\[cfg\(test\)\]',l): break  # skip test modules at file end
        m=re.match(r'\s*(pub(\([a-z]+\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)',l)
        if m and not l.rstrip().endswith(";"):
            depth=0; started=False; j=i
            while j<len(lines):
                code=re.sub(r'"(\\.|[^"\\])*"','""',lines[j])
                code=re.sub(r"'(\\.|[^'\\])'","''",code)
                code=code.split("//")[0]
                for ch in code:
                    if ch=='{': depth+=1; started=True
                    elif ch=='}': depth-=1
                if started and depth==0: break
                if not started and code.rstrip().endswith(";"): break
                j+=1
            if started: out.append((j-i+1,m.group(6),path))
            i=j+1; continue
        i+=1
    return out
allf=[]
for d in sys.argv[1:]:
    for root,_,files in os.walk(d):
        for f in files:
            if f.endswith(".rs"): allf+=fns(os.path.join(root,f))
n=[x[0] for x in allf]; n.sort()
p90=n[int(0.9*(len(n)-1))]
print(f"{' '.join(sys.argv[1:])}: {len(n)} functions, median {statistics.median(n):.0f}, p90 {p90}, over 70 lines {sum(1 for x in n if x>70)/len(n)*100:.1f}%, max {max(n)}")
for x in sorted(allf,reverse=True)[:5]: print("  ",x[0],x[1],x[2])
