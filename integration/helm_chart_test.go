package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
	"github.com/caddy-kas/caddy-kas/internal/helmchart"
)

// newChartHelm returns the Helm that hack/helm pins, for the chart in
// deploy/helm/agentk.
func newChartHelm(t *testing.T, s *suite) *helmchart.Helm {
	t.Helper()
	h, err := helmchart.New(s.repoRoot, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// adminKubectl returns a kubectl that talks to the test apiserver directly,
// as a member of system:masters.
func adminKubectl(s *suite, dir string) kubectl {
	return kubectl{bin: s.kubectlBin, kubeconfig: s.cluster.Kubeconfig, context: adminUser, home: filepath.Join(dir, "kubectl-home")}
}

// TestHelmChartServerDryRun renders the chart with each value file of its
// ci/ directory (between them they set every value) and has the real
// kube-apiserver check the manifests: kubectl apply --dry-run=server runs
// its validation, defaulting and admission without storing anything.
func TestHelmChartServerDryRun(t *testing.T) {
	s := requireSuite(t)
	h := newChartHelm(t, s)
	dir := testDir(t, s)
	admin := adminKubectl(s, dir)
	files, err := filepath.Glob(filepath.Join(h.Chart(), "ci", "*-values.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no value files in the chart's ci/ (%v)", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			ns := uniqueName("chart")
			admin.mustRun(t, "create", "namespace", ns)
			manifests, objects, err := h.Template("dry-run", ns, helmchart.Values{Files: []string{file}})
			if err != nil {
				t.Fatal(err)
			}
			out := admin.mustRun(t, "apply", "--dry-run=server", "-o", "name", "-f", writeManifest(t, dir, ns+".yaml", string(manifests)))
			if got := len(strings.Fields(out)); got != len(objects) {
				t.Errorf("the apiserver accepted %d objects, the chart rendered %d:\n%s", got, len(objects), out)
			}
		})
	}
}

// TestHelmChartAgentkInPod installs the chart (its objects applied for real
// to the test apiserver) and runs agentk as the rendered Deployment would
// have kubelet run it: the rendered args and env (the downward API
// resolved), the files of its Secret and ConfigMap volumes, and the
// service account's token (issued by the apiserver for the chart's service
// account), CA and namespace where a pod has them, with
// KUBERNETES_SERVICE_HOST and _PORT naming the apiserver. kubectl through
// Caddy then reaches the cluster as the chart's service account with the
// rights the chart bound, and as the impersonated identity of a user rule
// with the chart's impersonation role. Only the file paths of the volumes
// and the observability port change, to paths and a port of this test.
func TestHelmChartAgentkInPod(t *testing.T) {
	s := requireSuite(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("agentk reads its service account from %s, which the test mounts in a mount namespace of its own with unshare (util-linux): %v", serviceAccountMountPath, err)
	}
	kas := startCaddy(t, s, standardConfig())
	admin := adminKubectl(s, kas.dir)
	ns := uniqueName("chart")
	admin.mustRun(t, "create", "namespace", ns)

	caPEM, err := os.ReadFile(kas.rootCAFile())
	if err != nil {
		t.Fatal(err)
	}
	// The agent's own rights: the test cluster's reader role (its built-in
	// view role is empty, since no controller-manager aggregates it), so
	// that impersonation works only through the chart's impersonation role.
	values, err := yaml.Marshal(map[string]any{
		"config": map[string]any{
			"kasAddress":     kas.agentURL(),
			"token":          kas.config.agent(t, 1).token,
			"kasCaCert":      string(caPEM),
			"kasConnections": 2,
		},
		"rbac": map[string]any{"useExistingRole": readerRole},
	})
	if err != nil {
		t.Fatal(err)
	}
	valuesFile := writeSecretFile(t, kas.dir, "chart-values.yaml", string(values))
	h := newChartHelm(t, s)
	manifests, objects, err := h.Template("agentk", ns, helmchart.Values{Files: []string{valuesFile}})
	if err != nil {
		t.Fatal(err)
	}
	admin.mustRun(t, "apply", "-f", writeSecretFile(t, kas.dir, "chart.yaml", string(manifests)))

	pod := newChartPod(t, kas.dir, objects, ns)
	saToken := strings.TrimSpace(admin.mustRun(t, "create", "token", pod.spec.ServiceAccountName, "-n", ns))
	kubetest.NoteSecret(saToken, "the chart's service account token")
	clusterCA, err := os.ReadFile(s.cluster.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pod.writeFile(t, serviceAccountMountPath+"/token", []byte(saToken))
	pod.writeFile(t, serviceAccountMountPath+"/ca.crt", clusterCA)
	pod.writeFile(t, serviceAccountMountPath+"/namespace", []byte(ns))

	apiserver, err := url.Parse(s.cluster.URL)
	if err != nil {
		t.Fatal(err)
	}
	env := append(pod.env, "KUBERNETES_SERVICE_HOST="+apiserver.Hostname(), "KUBERNETES_SERVICE_PORT="+apiserver.Port(),
		"PATH="+os.Getenv("PATH")) // for sh and mount below
	// A private mount namespace in which the pod's /var/run (where the
	// service account is) is this test's directory; as root where the test
	// runs as root, else as root of a new user namespace. exec keeps the
	// process agentk's.
	args := []string{"--mount", "--propagation", "private"}
	if os.Geteuid() != 0 {
		args = append(args, "--user", "--map-root-user")
	}
	args = append(args, "sh", "-c", `mount --bind "$0" /var/run && exec "$@"`, pod.path("/var/run"), s.agentkBin)
	agent := &agentk{
		caddy:   kas,
		options: agentkOptions{agentID: 1},
		proc: startOwnedProcess(t, kubetest.ProcessSpec{
			Name:   "agentk-chart",
			Binary: unshare,
			Args:   append(args, pod.args...),
			Env:    env,
			LogDir: kas.dir,
		}),
		observabilityURL: "http://" + pod.observabilityAddress,
	}
	agent.waitReady(t)

	t.Run("probes", func(t *testing.T) {
		for name, probe := range map[string]*helmchart.Probe{"liveness": pod.container.LivenessProbe, "readiness": pod.container.ReadinessProbe} {
			resp, err := http.Get(agent.observabilityURL + probe.HTTPGet.Path)
			if err != nil {
				t.Fatalf("%s probe: %v", name, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("the %s probe's GET %s answered %s", name, probe.HTTPGet.Path, resp.Status)
			}
		}
	})

	t.Run("in-cluster configuration and tunnels", func(t *testing.T) {
		err := kubetest.Eventually(agentkReadyTimeout, func() error {
			if n := strings.Count(agent.proc.Stderr(), `"msg":"tunnel connected"`); n != 2 {
				return fmt.Errorf("%d tunnels connected, want config.kasConnections=2", n)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
		log := agent.proc.Stderr()
		for _, want := range []string{`"msg":"using the in-cluster service account"`, `"pod_namespace":"` + ns + `"`, `"pod_name":"` + pod.name + `"`} {
			if !strings.Contains(log, want) {
				t.Errorf("agentk's log does not show %s", want)
			}
		}
	})

	t.Run("the agent's own identity is the chart's service account", func(t *testing.T) {
		ops := kas.kubectl(t, "ops", 1)
		if who, want := ops.whoami(t).Username, "system:serviceaccount:"+ns+":"+pod.spec.ServiceAccountName; who != want {
			t.Errorf("user ops reached the apiserver as %q, want %q", who, want)
		}
		if got := strings.TrimSpace(ops.mustRun(t, "get", "namespace", "default", "-o", "name")); got != "namespace/default" {
			t.Errorf("kubectl get namespace default printed %q", got)
		}
		// rbac.useExistingRole bound the reader role, not cluster-admin
		ops.mustFail(t, "forbidden", "create", "configmap", "by-ops", "-n", ns)
	})

	t.Run("impersonation through the chart's role", func(t *testing.T) {
		dev := kas.kubectl(t, "dev", 1)
		if who := dev.whoami(t); who.Username != aliceUser {
			t.Errorf("user dev reached the apiserver as %q, want the impersonated %q", who.Username, aliceUser)
		}
		dev.mustRun(t, "get", "configmaps", "-n", ns)
		// The checks of the apiserver's impersonation filter for each
		// Impersonate-* header, asked as SubjectAccessReviews: kubectl
		// auth can-i cannot name a subresource of a group's resource.
		sa := "system:serviceaccount:" + ns + ":" + pod.spec.ServiceAccountName
		for _, header := range []struct{ name, group, resource, subresource string }{
			{"Impersonate-User", "", "users", ""},
			{"Impersonate-Group", "", "groups", ""},
			{"Impersonate-User (a service account)", "", "serviceaccounts", ""},
			{"Impersonate-Uid", "authentication.k8s.io", "uids", ""},
			{"Impersonate-Extra-Agent.gitlab.com%2fid", "authentication.k8s.io", "userextras", "agent.gitlab.com/id"},
			{"Impersonate-Extra-Team", "authentication.k8s.io", "userextras", "team"},
		} {
			review, err := json.Marshal(map[string]any{
				"apiVersion": "authorization.k8s.io/v1",
				"kind":       "SubjectAccessReview",
				"spec": map[string]any{
					"user":   sa,
					"groups": []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
					"resourceAttributes": map[string]string{
						"verb": "impersonate", "group": header.group, "resource": header.resource, "subresource": header.subresource, "name": "x",
					},
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			r := admin.runInput(bytes.NewReader(review), "create", "-f", "-", "-o", "jsonpath={.status.allowed}")
			if r.err != nil || r.stdout != "true" {
				t.Errorf("the chart's service account may not send %s: %q %s (%v)", header.name, r.stdout, r.stderr, r.err)
			}
		}
	})
}

// serviceAccountMountPath is where kubelet mounts a pod's service account.
const serviceAccountMountPath = "/var/run/secrets/kubernetes.io/serviceaccount"

// chartPod is the rendered Deployment's agentk container, made ready to
// run as a local process: its files under root, its arguments with the
// volume paths under root, and its environment resolved.
type chartPod struct {
	root                 string
	name                 string // the pod's name, as a ReplicaSet would make it
	spec                 helmchart.PodSpec
	container            helmchart.Container
	args                 []string
	env                  []string
	observabilityAddress string // on loopback, where the rendered port was
}

// path is where the pod's file p is on this machine.
func (p *chartPod) path(podPath string) string {
	return filepath.Join(p.root, filepath.FromSlash(podPath))
}

func (p *chartPod) writeFile(t *testing.T, podPath string, data []byte) {
	t.Helper()
	local := p.path(podPath)
	if err := os.MkdirAll(filepath.Dir(local), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(local, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func newChartPod(t *testing.T, dir string, objects []helmchart.Object, ns string) *chartPod {
	t.Helper()
	var deployment helmchart.Deployment
	if err := helmchart.Find(objects, "Deployment", "", &deployment); err != nil {
		t.Fatal(err)
	}
	deploymentName := ""
	for _, o := range objects {
		if o.Kind == "Deployment" {
			deploymentName = o.Metadata.Name
		}
	}
	spec := deployment.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("the Deployment has %d containers, want agentk alone", len(spec.Containers))
	}
	p := &chartPod{
		root: filepath.Join(dir, "pod"),
		// <deployment>-<pod template hash>-<random>, as its ReplicaSet names it
		name:      deploymentName + "-5d8f7c9b6-" + kubetest.RandomHex(3)[:5],
		spec:      spec,
		container: spec.Containers[0],
	}

	// The volumes' files, from the rendered Secrets and ConfigMaps.
	for _, m := range p.container.VolumeMounts {
		for _, v := range spec.Volumes {
			if v.Name != m.Name {
				continue
			}
			var data map[string][]byte
			var items []helmchart.KeyPath
			switch {
			case v.Secret != nil:
				var secret helmchart.Secret
				if err := helmchart.Find(objects, "Secret", v.Secret.SecretName, &secret); err != nil {
					t.Fatalf("volume %s: %v", v.Name, err)
				}
				data, items = secret.Data, v.Secret.Items
			case v.ConfigMap != nil:
				var cm helmchart.ConfigMap
				if err := helmchart.Find(objects, "ConfigMap", v.ConfigMap.Name, &cm); err != nil {
					t.Fatalf("volume %s: %v", v.Name, err)
				}
				data, items = map[string][]byte{}, v.ConfigMap.Items
				for k, s := range cm.Data {
					data[k] = []byte(s)
				}
			default:
				t.Fatalf("volume %s is neither a Secret nor a ConfigMap", v.Name)
			}
			if len(items) == 0 { // every key, as a file of its name
				for k := range data {
					items = append(items, helmchart.KeyPath{Key: k, Path: k})
				}
			}
			for _, item := range items {
				value, ok := data[item.Key]
				if !ok {
					t.Fatalf("volume %s projects key %s, which its source does not have", v.Name, item.Key)
				}
				p.writeFile(t, path.Join(m.MountPath, item.Path), value)
			}
		}
	}

	// The observability port the probes ask must be the one agentk
	// listens on; here it listens on a free loopback port instead.
	probePort := string(p.container.LivenessProbe.HTTPGet.Port)
	containerPort := 0
	for _, cp := range p.container.Ports {
		if strconv.Quote(cp.Name) == probePort || strconv.Itoa(cp.ContainerPort) == probePort {
			containerPort = cp.ContainerPort
		}
	}
	p.observabilityAddress = fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	listenArg := fmt.Sprintf("--observability-listen-address=:%d", containerPort)
	listens := false
	for _, arg := range p.container.Args {
		name, value, _ := strings.Cut(arg, "=")
		switch {
		case arg == listenArg:
			arg, listens = name+"="+p.observabilityAddress, true
		case strings.HasPrefix(value, "/"):
			arg = name + "=" + p.path(value) // a file of a volume
		}
		p.args = append(p.args, arg)
	}
	if !listens {
		t.Fatalf("the probes ask port %s (%d), and agentk's args %q do not say %s", probePort, containerPort, p.container.Args, listenArg)
	}

	for _, e := range p.container.Env {
		value := e.Value
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil {
				t.Fatalf("env %s: only the downward API's fieldRef is resolved here", e.Name)
			}
			switch field := e.ValueFrom.FieldRef.FieldPath; field {
			case "metadata.namespace":
				value = ns
			case "metadata.name":
				value = p.name
			default:
				t.Fatalf("env %s: field %s is not resolved here", e.Name, field)
			}
		}
		p.env = append(p.env, e.Name+"="+value)
	}
	return p
}
