package integration

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// suite is what TestMain sets up once for every test of the package.
type suite struct {
	workDir    string
	repoRoot   string
	caddyBin   string
	agentkBin  string
	kubectlBin string
	cluster    *kubetest.Cluster
}

var (
	// shared is the package's suite; nil while tests are skipped.
	shared *suite
	// skipReason says why every test is skipped, or is empty.
	skipReason string
)

// requireSuite returns the shared suite, or skips t when the environment
// cannot run these tests.
func requireSuite(t *testing.T) *suite {
	t.Helper()
	kubetest.ConsultEnv()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	recordSourcesOnce.Do(func() { recordSources(shared.repoRoot) })
	return shared
}

var recordSourcesOnce sync.Once

// recordSources stats every file of the repository. The tests exercise
// binaries built from sources that are not among this package's
// dependencies; stating them makes go test's cache (which tracks files
// that tests open or stat inside the module) drop a cached result once
// any of them changes.
func recordSources(root string) {
	_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return nil // a file that vanished meanwhile changes nothing here
		case d.IsDir() && d.Name() == ".git":
			return filepath.SkipDir
		case !d.IsDir():
			_, _ = os.Stat(path)
		}
		return nil
	})
}

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	flag.Parse()
	testbin, skip, err := kubetest.TestbinFromEnv("integration tests start real processes; skipped in -short mode")
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	if skip != "" {
		skipReason = skip
		return m.Run()
	}

	workDir, err := os.MkdirTemp("", "caddy-kas-integration-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	defer os.RemoveAll(workDir)

	s, err := setUpSuite(workDir, testbin)
	if s != nil && s.cluster != nil {
		defer s.cluster.Stop()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	shared = s
	return m.Run()
}

func setUpSuite(workDir, testbin string) (*suite, error) {
	s := &suite{workDir: workDir}
	kubectlBin, err := exec.LookPath("kubectl")
	if err != nil {
		return nil, fmt.Errorf("the integration tests drive the real kubectl, and none is on PATH: %w", err)
	}
	s.kubectlBin = kubectlBin

	binDir := filepath.Join(workDir, "bin")
	start := time.Now()
	fmt.Fprintf(os.Stderr, "integration: building caddy and agentk (race detector: %v)\n", raceEnabled)
	if s.repoRoot, err = buildProducts(binDir); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "integration: built in %s\n", time.Since(start).Round(time.Second))
	s.caddyBin = filepath.Join(binDir, "caddy")
	s.agentkBin = filepath.Join(binDir, "agentk")

	s.cluster, err = startKubeCluster(filepath.Join(workDir, "kube"), testbin, kubectlBin)
	return s, err
}

// buildProducts builds the caddy and agentk binaries of this repository into
// binDir, with the race detector when the tests themselves run with it, and
// returns the repository's root.
func buildProducts(binDir string) (root string, err error) {
	goBin, err := goTool()
	if err != nil {
		return "", err
	}
	root, err = repoRoot(goBin)
	if err != nil {
		return "", err
	}
	args := []string{"build", "-o", binDir + string(filepath.Separator)}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/caddy", "./cmd/agentk")
	cmd := exec.Command(goBin, args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return root, nil
}

// goTool finds the go command: on PATH, or in GOROOT, which go test sets.
func goTool() (string, error) {
	if path, err := exec.LookPath("go"); err == nil {
		return path, nil
	}
	if goroot := os.Getenv("GOROOT"); goroot != "" {
		path := filepath.Join(goroot, "bin", "go")
		if _, err := os.Stat(path); err == nil {
			return path, nil
		}
	}
	return "", errors.New("cannot find the go command to build caddy and agentk: not on PATH and GOROOT is not set")
}

// repoRoot is the directory of the module that holds this package.
func repoRoot(goBin string) (string, error) {
	out, err := exec.Command(goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("go env GOMOD names no go.mod; run the tests from inside the repository")
	}
	return filepath.Dir(gomod), nil
}
