package docs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnitVerifies runs the guide's systemd unit through
// systemd-analyze verify, which knows every directive of the systemd it
// comes with, so that a misspelt or misplaced setting fails. The unit's
// binary is replaced by this test's own, since verify checks that
// ExecStart names an executable.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("systemd-analyze is needed to check the guide's systemd unit (Debian package systemd)")
		}
		t.Skip("systemd-analyze is not installed (Debian package systemd)")
	}
	unit := fencedBlocks(readGuide(t), "ini")
	if len(unit) != 1 || !strings.Contains(unit[0], "[Service]") {
		t.Fatalf("want one ```ini block, the systemd unit, in the guide; found %d", len(unit))
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	body := strings.ReplaceAll(unit[0], "/usr/local/bin/caddy", self)
	file := filepath.Join(t.TempDir(), "caddy-kas.service")
	if err := os.WriteFile(file, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", file).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify of the guide's unit: %v\n%s", err, out)
	}
}
