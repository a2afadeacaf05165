package agentconfig

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	yamlv2 "sigs.k8s.io/yaml/goyaml.v2"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// FuzzParse checks that Parse never panics, that what it refuses it
// refuses with an error of its own kinds, and that what it accepts
// survives the way back: encoded as the agent_configuration body does,
// written as YAML and parsed again, it is the same configuration.
func FuzzParse(f *testing.F) {
	for _, c := range acceptCases {
		f.Add([]byte(c.yaml))
	}
	for _, c := range refuseCases {
		f.Add([]byte(c.yaml))
	}
	for _, v := range awkwardStrings {
		f.Add(awkwardFile(v))
	}
	golden, _ := filepath.Glob(filepath.Join("testdata", "rails", "*.yaml"))
	for _, name := range golden {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			var e *Error
			if cfg != nil || (!errors.As(err, &e) && !errors.Is(err, ErrTooLarge)) {
				t.Fatalf("Parse = %v, %v (%T)", cfg, err, err)
			}
			return
		}
		_ = ToAgentConfiguration(cfg, 1, 2, "group/project", "https://gitlab.example.com")
		body, err := RailsBody(1, cfg)
		if err != nil {
			t.Fatalf("RailsBody: %v", err)
		}
		checkRailsBody(t, body, 1, cfg)

		again := reparse(t, cfg)
		if !proto.Equal(again, cfg) {
			t.Fatalf("round trip changed the configuration:\nfirst %v\nthen  %v", prototext.Format(cfg), prototext.Format(again))
		}
	})
}

// reparse writes cfg back as YAML, with the names and value forms of the
// agent_configuration body, and parses that.
func reparse(t *testing.T, cfg *agentcfg.ConfigurationFile) *agentcfg.ConfigurationFile {
	t.Helper()
	j, err := configJSON(cfg)
	if err != nil {
		t.Fatalf("configJSON: %v", err)
	}
	var v any
	if err := json.Unmarshal(j, &v); err != nil {
		t.Fatalf("configJSON made invalid JSON: %v", err)
	}
	y, err := yamlv2.Marshal(v)
	if err != nil {
		t.Fatalf("writing YAML: %v", err)
	}
	again, err := Parse(y)
	if err != nil {
		t.Fatalf("Parse of the configuration written back: %v\n%s", err, y)
	}
	return again
}

// awkwardStrings are the insides of YAML double-quoted strings, escapes
// included, that YAML treats specially.
var awkwardStrings = []string{
	``, ` `, ` lead`, `trail `, `yes`, `No`, `on`, `OFF`, `y`, `n`, `true`, `null`, `~`,
	`0x10`, `0o17`, `017`, `1e3`, `1_000`, `.inf`, `.NaN`, `-`, `- a`, `a: b`, `a #b`,
	`#`, `!tag`, `&a`, `*a`, `%x`, `@x`, "`x", `{a}`, `[a]`, `'`, `\"`, `\\`,
	`2001-12-14`, `12:30:45`, `<<`, `=`, `?`, `|`, `>`, `a\nb`, `a\n`, `\n`, `\t`, `\r\n`,
	`\0`, `\x7f`, `\x80`, `\x85`, `\u00a0`, `\u2028`, `\u2029`, `\ufeff`, `\ufffd`,
	`\U0001F600`, `\e`, `\a`, `\v`, `\b`, `a\u0000b`, `---`, `...`, `\ud7ff`, `\uffff`, `\ufffe`,
}

// awkwardFile puts v, the inside of a double-quoted string, in a few
// places of a configuration file.
func awkwardFile(v string) []byte {
	return []byte(`remote_development: {dns_zone: "` + v + `"}` + "\n" +
		`ci_access: {projects: [{id: "x` + v + `", environments: ["` + v + `x"]}]}` + "\n")
}

// TestRoundTripAwkwardStrings runs the round trip of FuzzParse on strings
// YAML treats specially.
func TestRoundTripAwkwardStrings(t *testing.T) {
	for _, v := range awkwardStrings {
		data := awkwardFile(v)
		cfg, err := Parse(data)
		if err != nil {
			t.Errorf("Parse(%q): %v", data, err)
			continue
		}
		again := reparse(t, cfg)
		if !proto.Equal(again, cfg) {
			t.Errorf("round trip of %q changed it:\nfirst %v\nthen  %v", v, prototext.Format(cfg), prototext.Format(again))
		}
		body, err := RailsBody(1, cfg)
		if err != nil {
			t.Fatal(err)
		}
		checkRailsBody(t, body, 1, cfg)
	}
}
