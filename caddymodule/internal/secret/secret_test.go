package secret

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "token")
	os.WriteFile(good, []byte("from-file\n"), 0o600)
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, []byte("\n"), 0o600)
	t.Setenv("KAS_TEST_TOKEN", " from-env ")

	tests := []struct {
		name, value, file string
		want, wantErr     string
	}{
		{"literal", "s3cret", "", "s3cret", ""},
		{"env placeholder", "{env.KAS_TEST_TOKEN}", "", "from-env", ""},
		{"file placeholder", "{file." + good + "}", "", "from-file", ""},
		{"file", "", good, "from-file", ""},
		{"both", "x", good, "", "not both"},
		{"neither", "", "", "", "no token configured"},
		{"missing file", "", filepath.Join(dir, "nope"), "", "reading token file"},
		{"empty file", "", empty, "", "is empty"},
		{"unset env", "{env.KAS_TEST_UNSET}", "", "", "{env.KAS_TEST_UNSET} is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Load(tt.value, tt.file)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("Load = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
