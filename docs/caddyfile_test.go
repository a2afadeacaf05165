package docs

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-kas/caddy-kas/caddymodule"
)

// productionCaddyfileMarker is the line right before the fenced block of
// the guide's Caddyfile.
const productionCaddyfileMarker = "<!-- production-caddyfile -->"

// offSetting is a setting the guide leaves off: "#" directly followed by
// its name, as in "#ca_file /etc/...". Prose comments have a space after
// the "#".
var offSetting = regexp.MustCompile(`(?m)^(\s*)#([a-z][a-z0-9_]*)(\s|$)`)

// TestProductionCaddyfileAdapts runs the guide's Caddyfile through the
// Caddyfile adapter, as "caddy adapt" does, with our modules: once as
// written and once with every setting that is off turned on, so that a
// misspelt or removed setting anywhere in it fails. As written, Caddy must
// also validate it (provision every module), so that a wrong value fails
// too.
func TestProductionCaddyfileAdapts(t *testing.T) {
	guide := readGuide(t)
	written := productionCaddyfile(t, guide)
	all := offSetting.ReplaceAllString(written, "$1$2$3")
	if n := len(offSetting.FindAllString(written, -1)); n < 5 {
		t.Fatalf("found %d settings that are off in the guide's Caddyfile, want the optional ones (ca_file, api_tls, gitaly_ca_file, ...)", n)
	}
	for name, body := range map[string]string{"as written": written, "every setting on": all} {
		t.Run(name, func(t *testing.T) {
			cfg := adapt(t, body)
			for _, want := range []string{`"handler":"kubernetes_agent"`, `"handler":"k8s_proxy"`, `"handler":"reverse_proxy"`, `"gitlab":{`} {
				if !strings.Contains(cfg, want) {
					t.Errorf("adapted config lacks %s:\n%s", want, cfg)
				}
			}
			agent := strings.Index(cfg, `"handler":"kubernetes_agent"`)
			proxy := strings.Index(cfg, `"handler":"k8s_proxy"`)
			gitlab := strings.Index(cfg, `"handler":"reverse_proxy"`)
			if agent > gitlab || proxy > gitlab {
				t.Errorf("reverse_proxy to GitLab comes before the agent server's handlers:\n%s", cfg)
			}
		})
	}

	// As written, it is a configuration Caddy runs: every value is
	// checked, and the secret file is loaded from where systemd puts it.
	t.Run("valid", func(t *testing.T) {
		dir := t.TempDir()
		t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
		t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
		t.Setenv("CREDENTIALS_DIRECTORY", dir)
		writeSecret(t, filepath.Join(dir, "gitlab_kas_secret"))
		body := strings.ReplaceAll(written, "/var/log/caddy-kas/", dir+"/")
		var cfg caddy.Config
		if err := json.Unmarshal([]byte(adapt(t, body)), &cfg); err != nil {
			t.Fatal(err)
		}
		if err := caddy.Validate(&cfg); err != nil {
			t.Errorf("the guide's Caddyfile does not validate: %v", err)
		}
	})

	// Every setting the guide explains in its tables is in the Caddyfile,
	// so the adapter checked it.
	settings := map[string]bool{}
	for _, line := range strings.Split(all, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			settings[f[0]] = true
		}
	}
	for _, name := range explainedSettings(guide) {
		if !settings[name] {
			t.Errorf("the guide explains %q, which its Caddyfile does not have", name)
		}
	}
}

// TestGuideCaddyfilesAdapt adapts every other Caddyfile of the guide too:
// snippets such as a second site block.
func TestGuideCaddyfilesAdapt(t *testing.T) {
	blocks := caddyfileBlocks(readGuide(t))
	if len(blocks) < 2 {
		t.Fatalf("found %d Caddyfile blocks in the guide, want the production one and the snippets", len(blocks))
	}
	for _, b := range blocks {
		if !strings.Contains(adapt(t, b), `"handler":"kubernetes_agent"`) {
			t.Errorf("a Caddyfile of the guide serves no agents:\n%s", b)
		}
	}
}

// caddyfileBlocks returns the contents of every ```caddyfile block of the
// guide.
func caddyfileBlocks(guide string) []string { return fencedBlocks(guide, "caddyfile") }

// fencedBlocks returns the contents of every fenced block of the language,
// also those indented in a list item, without their indentation.
func fencedBlocks(guide, language string) []string {
	var blocks []string
	var block []string
	indent, in := "", false
	for _, line := range strings.Split(guide, "\n") {
		trimmed := strings.TrimLeft(line, " ")
		switch {
		case !in && trimmed == "```"+language:
			indent, in, block = line[:len(line)-len(trimmed)], true, nil
		case in && trimmed == "```":
			blocks = append(blocks, strings.Join(block, "\n")+"\n")
			in = false
		case in:
			block = append(block, strings.TrimPrefix(line, indent))
		}
	}
	return blocks
}

// adapt returns the JSON config of a Caddyfile; warnings fail the test.
func adapt(t *testing.T, caddyfile string) string {
	t.Helper()
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting:\n%s\n%v", caddyfile, err)
	}
	for _, w := range warnings {
		t.Errorf("adapting: warning: %s", w.String())
	}
	return string(cfg)
}

func readGuide(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("production.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// productionCaddyfile returns the fenced block after the marker.
func productionCaddyfile(t *testing.T, guide string) string {
	t.Helper()
	_, rest, ok := strings.Cut(guide, productionCaddyfileMarker+"\n")
	if !ok {
		t.Fatalf("production.md has no %s line", productionCaddyfileMarker)
	}
	rest, ok = strings.CutPrefix(rest, "```caddyfile\n")
	if !ok {
		t.Fatalf("%s is not followed by a ```caddyfile block", productionCaddyfileMarker)
	}
	body, _, ok := strings.Cut(rest, "\n```\n")
	if !ok {
		t.Fatal("the production Caddyfile block does not end")
	}
	return body + "\n"
}

// settingsSections are the headings of the guide's sections whose tables
// explain Caddyfile settings (first column) or name them (second column).
var settingsSections = map[string]int{
	"### The `kas` global option, `gitlab` block":        1,
	"### `kubernetes_agent`":                             1,
	"### `k8s_proxy`":                                    1,
	"### GitLab KAS's configuration, setting by setting": 2,
}

var settingName = regexp.MustCompile("`([a-z][a-z0-9_]*)`")

// explainedSettings returns the setting names in backticks in the given
// column of the tables of settingsSections.
func explainedSettings(guide string) []string {
	var names []string
	column := 0
	sc := bufio.NewScanner(strings.NewReader(guide))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			column = settingsSections[line]
			continue
		}
		if column == 0 || !strings.HasPrefix(line, "| ") || strings.HasPrefix(line, "|---") {
			continue
		}
		cells := strings.Split(line, " | ")
		if len(cells) <= column-1 {
			continue
		}
		for _, m := range settingName.FindAllStringSubmatch(cells[column-1], -1) {
			names = append(names, m[1])
		}
	}
	return names
}
